"""weightgeo.train: the reference training loop that produces real SFT / OPD / RLVR checkpoint streams.

Nanogpt-sized, one file per algorithm: ``model.py`` (the transformer, HF-layout bf16 checkpoints),
``task.py`` (3-digit addition with a binary reward), ``losses.py`` (pure loss/advantage functions),
``sft.py`` / ``opd.py`` / ``rlvr.py`` (dataclass config + ``train``), ``projector.py`` (subspace-constrained
gradients), ``pretrain.py`` (the shipped base and teacher), ``loop.py`` (what the algorithm files share: AdamW,
schedules, the checkpoint stream, evaluation, rollouts, per-step seeding, run start / finish, the PG update),
``hf.py`` (optional: a transformers ``AutoModelForCausalLM`` as student or teacher; needs
``pip install 'weightgeo[hf]'``). Nothing in the core library imports this package, and this package imports
transformers only when asked for the HF path.
"""
