"""Drop-in use of the spa_kernels loss in other trainers (docs/integrations.md):

    spa_kernels.integrations.trl    DPOTrainer / patch_dpo_trainer for TRL's DPOTrainer (needs trl)
    spa_kernels.integrations.hf     add_logprob_head, PreferenceCollator, preference_loss_from_model and a
                                    transformers.Trainer mixin for (prompt, chosen, rejected) data

Submodules are imported on demand: importing spa_kernels never imports transformers or trl.
"""
