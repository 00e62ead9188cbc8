"""ArchRoute on Ray Serve (``archroute serve --ray``, the ``ray`` extra): the same router,
settings and OpenAI API, its replicas and the in-process models' replicas placed by Ray
Serve across a cluster (docs/router.md, "Scaling out on Ray Serve").

- :mod:`~router.rayserve.cluster`: join or start the cluster, check, run, stop;
- :mod:`~router.rayserve.deploy`: the application (router ingress, one deployment per
  in-process backend, the span pair's deployment) built from the settings;
- :mod:`~router.rayserve.ingress`: a router replica (``create_app`` over handles);
- :mod:`~router.rayserve.replicas`: the model and span replicas;
- :mod:`~router.rayserve.handles`: backends whose calls go through deployment handles.

Importing this package imports no Ray; its modules import it where they need it.
"""
