"""Stage 5, training: the pretraining loop under torchrun (DDP), its checkpoints and its validation loss.

Read in this order:
1. `train.py`      - the loop first, then one optimizer step (gradient accumulation, clipping, AdamW,
                     the LR schedule), then set-up: model, optimizer, data, logs, resume.
2. `config.py`     - `TrainConfig`: every setting, its default and help; the presets; the CLI flags.
3. `checkpoint.py` - what a checkpoint holds, how it is written atomically, why resume is exact.
4. `validation.py` - the validation loss as an exact token mean across ranks.
5. `hub_push.py`   - --push-to-hub: each save uploaded beside training by a worker thread; failed pushes
                     ride on the next save, the last one is retried at the end, none crashes the run.

The process group itself is `minicodeparrot/dist.py`. Skip on a first reading: the signal
handling and the metrics plumbing at the end of `train.py`.
"""
