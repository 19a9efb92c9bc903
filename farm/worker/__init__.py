"""The worker side: the resources a worker process owns (``resources``), the execution of one
shard under a lease (``runtime``, ``shard_run``, ``lease_keeper``), pinned models
(``model_cache``, ``components``) and one shard runner per job kind (``kinds``).

Torch and diffusers are imported only by the runners, the shared image renderer and the model
loaders, which only a rendering worker reaches; the client, the CLI and control workers import
``resources`` and ``runtime`` without them.
"""
