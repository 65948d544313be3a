"""Runtime glue: the only code that imports ray.data / ray.train / ray.serve."""
