"""weightgeo.train: the reference training loop that produces real SFT / OPD / RLVR checkpoint streams.

Nanogpt-sized, one file per algorithm: ``model.py`` (the transformer, HF-layout bf16 checkpoints),
``task.py`` (3-digit addition with a per-column scratchpad; the verifier reads the final answer only),
``losses.py`` (pure loss/advantage functions, the permuted-advantage null), ``sft.py`` / ``opd.py`` /
``rlvr.py`` (dataclass config + ``train``), ``projector.py`` (subspace-constrained gradients),
``pretrain.py`` (the shipped base and teacher), ``loop.py`` (what the algorithm files share: AdamW,
schedules, the checkpoint writer with fp32 masters, evaluation, rollouts, per-step seeding, run start /
finish, the PG update), ``regime.py`` (the regime checks R1-R3: accuracy, reverse KL, lengths),
``stats.py`` (paired bootstrap CIs and the claim verdict rule), ``hf.py`` (optional: a transformers
``AutoModelForCausalLM`` as student or teacher; needs ``pip install 'weightgeo[hf]'``). Nothing in the core
library imports this package, and this package imports transformers only when asked for the HF path.
"""
