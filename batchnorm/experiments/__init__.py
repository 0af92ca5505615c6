"""The experiments of ``batchnorm reproduce``: one module per experiment, registered by name.

Each module defines ``TITLE``, ``Config`` (a frozen dataclass of the default settings, with a
comment on every default), ``QUICK`` (the settings ``--quick`` changes: steps only), ``LIMITS``
(a :class:`~batchnorm.experiments.config.Limit` for every setting), optionally ``validate(cfg)``
(how the settings fit together), ``PUBLISHED`` (the published numbers to compare with),
``run(ctx)`` (trains, resumably, and returns the numbers for results.json), and ``metrics``,
``figures``, ``sections`` and ``headline``, which build the reports from results.json alone.
``LIMITS`` and ``validate`` are checked before any data is read. Importing this package imports
no experiment.
"""

# CLI name -> (module, one-line description for --help), in the order `all` runs them.
EXPERIMENTS = {
    "mnist": ("mnist", "paper §4.1, Fig. 1: 3x100 sigmoid MLP with and without BN, "
                       "test accuracy and sigmoid-input percentiles"),
    "init-scale": ("init_scale", "weight-init scale sweep (16 stds): 5x100 ReLU MLP, "
                                 "training accuracy with and without BN"),
    "learning-rate": ("learning_rate", "small convnet at 1x, 5x, 30x learning rate with and "
                                       "without BN: steps to a target accuracy, divergence"),
    "batch-size": ("batch_size", "noise of the batch mean against 1/sqrt(m); test accuracy "
                                 "against batch size (2 to 256), and 32 per step in groups of "
                                 "2 to 32 with Ghost BN and Batch Renorm"),
    "inference": ("inference", "Algorithm 2: EMA vs exact population statistics vs batch "
                               "statistics at inference, and the folded affine transform"),
}
