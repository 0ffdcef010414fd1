"""The weave: how a decoder stack's reductions run (`executor`: baseline, fused, weave, nocomm),
which of them a step gets (`policy`), and where the weave cuts a step (`splitter`, with the
`wave_model` and a tuned `split_table`). Below the models: it knows a stack only by its shape and
a family only by its GEMMs, so the registered families, models of one's own
(`weavelm.models.decoder.WovenDecoder`) and the engine all run through it."""
