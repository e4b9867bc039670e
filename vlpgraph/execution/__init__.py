"""Running a sweep's trials into the store.

``executor`` the interface (``Executor.run(exp)``) and the signal handling around it; ``sequential``
and ``ray_executor`` its two implementations; ``scheduler`` the store bookkeeping they share (claims,
skips, heartbeats, outcome lines); ``trial`` one trial's job (compile, fit, evaluate) and the sink it
reports through; ``train`` the training loop; ``display`` the progress bars; ``ranks`` the device and
torchrun's processes."""
