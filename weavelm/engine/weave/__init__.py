"""The weave and its siblings: how a step's decoder stack is run (`executor`: baseline, fused,
weave, nocomm), which of them a step gets (`policy`), and where the weave cuts it (`splitter`,
with the `wave_model` and a tuned `split_table`)."""
