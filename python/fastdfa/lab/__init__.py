"""The lab: CLI, training loop, fine-tuning runs, benchmarks and data loaders, apart from the library.

It uses the library (``fastdfa``); the library never imports it.

    cli.py        ``python -m fastdfa train | compare | finetune | bench | info``
    train.py      TrainConfig and the training loop
    finetune.py   Feedback-Weight Matching fine-tuning runs
    bench.py      the bench grid against BP and the re-created baselines
    baselines.py  biotorch-style and TinyDFA-style DFA, for the bench
    steptime.py   interleaved step timing (the only step-time ratio fastdfa reports)
    data.py       scikit-learn's digits and Fashion-MNIST loaders
"""
