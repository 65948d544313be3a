"""Running revmix on a Ray cluster.

- ``launch``: the ``revmix launch`` command (Ray Jobs API submission with a runtime env that ships the project);
- ``resources``: how many trials fit on which nodes (``plan_trials``, ``trial_footprint``);
- ``validate``: offline validation of ``configs/cluster`` (Ray's launcher schema + ``prepare_config``, and a
  strict KubeRay schema from ``schemas/kuberay.py``).

Nothing is imported here, so ``revmix --help`` never pays for ray.
"""
