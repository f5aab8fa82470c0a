"""The tools around the library: `bench` and `bench_table` (throughput), `pictures`, `summary`, `probe` (the linear
probe task), `import_teacher` (PyTorch teachers), `study` and `beyond` (the Fashion-MNIST studies). Each is a
command, `python -m wcord_jax.tools.NAME`; nothing in the library proper imports them (tests/test_layout.py), only
`wcord_jax.main`, which dispatches the probe task."""
