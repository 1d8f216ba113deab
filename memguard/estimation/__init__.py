"""Estimation: the peak memory of one training step, before it runs, on any machine.

The entry point is :func:`memguard.estimate` (:mod:`.estimator`). It normalises what is asked
(:mod:`.spec`), resolves the model and builds its inputs (:mod:`.models`, :mod:`.arch`), runs one
method — the trace (:mod:`.trace`: record, classify, analyse, with :mod:`.cuda_rules` and
:mod:`.allocator`), the formula (:mod:`.formula`) or the seed (:mod:`.seed`) — shares model state
over ranks (:mod:`.parallel`), adds what the device costs beyond tensors (:mod:`.overhead`), and
returns one :class:`~memguard.MemoryEstimate` (:mod:`.result`). :mod:`.search` finds the largest
batch that fits. Nothing here touches a Trainer or prints.
"""
