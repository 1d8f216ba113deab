"""GPU tests that say what they train, so memguard skips them (or fails them) before they run out of memory.

The plugin comes with memguard (the ``pytest11`` entry point); nothing to enable. Run:

    pytest examples/ci/test_gpu_example.py -rs                         # against this machine's GPU
    pytest examples/ci/test_gpu_example.py -rs --memguard-gpu L4       # against a catalog GPU (bf16: not a T4)
    pytest examples/ci/test_gpu_example.py -rs --memguard-gpu A100-40GB --memguard-check-only
                                                   # on a runner without a GPU: the checks only

Each marked test is estimated once before its fixtures are set up; when the step does not fit
the GPU's free memory less the margin, the test is skipped with the estimate table as the reason
(``on_oom="fail"``: it errors instead). Without a GPU and without ``--memguard-gpu``, marked tests
are skipped: they could not run there anyway.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.memguard("gpt2", batch_size=8, seq_len=1024, precision="bf16-mixed")
def test_gpt2_finetune_step(memguard_estimate):
    """A real training step of GPT-2; skipped where 8 x 1024 tokens cannot fit."""
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config()).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The estimate is what the step needs beyond what is already there; the peak of live
    # tensors should stay below it.
    assert torch.cuda.max_memory_allocated() <= memguard_estimate.peak_bytes * 1.1


@pytest.mark.memguard("gpt2-xl", batch_size=4, seq_len=1024, precision="bf16-mixed", gradient_checkpointing=True,
                      on_oom="fail", margin=0.05)
def test_gpt2_xl_must_fit():
    """A configuration the team relies on: fail loudly, not skip, when the runner cannot hold it."""
    pytest.skip("the training itself is out of scope for this example")
