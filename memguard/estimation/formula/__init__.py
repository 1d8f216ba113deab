"""The refined formula: peak live tensor bytes of a training step, in closed form.

Where the seed formula (:mod:`memguard.estimation.seed`) counts one weight matrix and two
activations per block, this formula counts what a training step really keeps, term by term, one
module per concern:

* ``model_state``: parameters, gradients and optimizer state from the module's own parameters
  (EleutherAI, "Transformer Math 101": bytes per parameter by dtype and optimizer; frozen
  parameters have no gradient and no state), and the optimizer step's temporaries; read from the
  module once by ``inventory``;
* ``blocks``: per transformer block, every tensor autograd saves for the backward pass
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  section 4), by component: ``attention`` (linear inputs, scores/softmax/dropout mask, or a fused
  kernel's output and log-sum-exp), ``mlp`` (activations and dropout masks), ``norms`` (inputs
  and statistics); laid out per family by the table of :mod:`memguard.estimation.families` (gpt2, bert/roberta/
  distilbert, bart, t5, llama/mistral/qwen2, vit, CLIP's text and vision towers, plain
  ``nn.TransformerEncoder``) for the
  attention kernel that will run (``context``);
* ``embeddings`` and ``head``: the batch, what the embeddings save, and what sits between the last
  block and the logits; ``loss``: the loss's copies of the logits, which are often the largest
  single activation;
* on ``device="cuda"`` with mixed precision, CUDA's autocast op lists as the trace applies them
  (:mod:`memguard.estimation.cuda_rules`): an fp32 softmax in eager attention, fp32 Python GELUs
  (``pow``), a 16-bit ``log_softmax`` with ``nll_loss``'s fp32 copy for 16-bit logits;
* ``activations``: the blocks that save anything given which parameters are trainable, gradient
  checkpointing (only each block's input is kept, one block is recomputed at a time);
* ``phases``: the moments of a step (end of forward, start and end of backward, optimizer step),
  whose maximum is the peak.

Everything is integer bytes of live tensors: what ``torch.cuda.max_memory_allocated()`` reports
on a GPU, or how far resident memory grows on a CPU. Device overhead (CUDA context, allocator
rounding) is added by :mod:`memguard.estimation.overhead`.

Known limitations:
    * Block layouts are written out for the families of :mod:`memguard.estimation.families`; other
      transformers models are estimated with the nearest family, and the notes say so, except the
      model types known to differ from it and not written out (CLIP's and SigLIP's dual models,
      SigLIP's vision tower, Swin), which are refused for the trace
      (:func:`~memguard.estimation.formula.families.refuse_unmodelled`).
    * Activations of a frozen block that sits above a trainable one are counted as if it were
      trainable (it keeps slightly less: no linear inputs).
    * The model's output (logits included) is taken to be dropped before ``backward``, as in
      Lightning's ``training_step`` and transformers' ``Trainer``: only the loss outlives the
      forward.
"""

from __future__ import annotations

from memguard.estimation.formula.activations import Activations, activation_bytes
from memguard.estimation.formula.model_state import (
    ModelState,
    model_state,
    optimizer_state_bytes,
)
from memguard.estimation.formula.phases import formula_breakdown

__all__ = [
    "Activations",
    "ModelState",
    "activation_bytes",
    "formula_breakdown",
    "model_state",
    "optimizer_state_bytes",
]
