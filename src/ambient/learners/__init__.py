"""Learners: ``core`` (what every training loop shares: epoch order, guarded steps, EMA, resume checks),
``train_config`` and ``train`` (ambient training, ``TrainConfig``), ``runlog`` (a run's log, stats and
sample grids), ``gaussian_prior`` and ``em`` (the EM learner and its Gaussian start), ``finetune_config``
and ``finetune`` (finetuning pretrained diffusers UNets), ``demo`` (naive vs ambient, side by side),
``kspace_ambient`` (ambient training on undersampled k-space, a library API).

Import the learner you need from its module (``from ambient.learners.train import train``): this file
imports nothing, so that lower layers never load the training code.
"""
