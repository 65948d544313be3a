"""JSON schemas for the cluster manifests revmix ships (see ``kuberay.py``)."""
