"""The lab: CLI, training loop, fine-tuning runs, benchmarks and data loaders, apart from the library.

It uses the library (``fastdfa``); the library never imports it.

    cli.py            ``python -m fastdfa train | compare | finetune | bench | data | info``
    train.py          TrainConfig and the training loop (image models, the transformer LM, GPT-2)
    finetune.py       Feedback-Weight Matching fine-tuning runs on image tasks
    finetune_hf.py    ``finetune --model minilm``: a pretrained Hugging Face BERT on text (reviews, bbc)
    bench.py          the bench grid against BP and the re-created baselines
    pipeline_bench.py ``bench --pipeline``: DFAPipeline against torch's BP pipelines and one process
    baselines.py      biotorch-style and TinyDFA-style DFA, for the bench
    steptime.py       interleaved step timing (the only step-time ratio fastdfa reports)
    plots.py          WA / GA plots of ``--log-alignment`` runs
    data/             the data sources, one module each (digits, Fashion-MNIST, IDX directories, Jane
                      Austen in characters and BPE, the text tasks reviews and bbc, the MiniLM model) and
                      DATASETS, the one registry (--data, python -m fastdfa data NAME); data_dir, record_path
"""
