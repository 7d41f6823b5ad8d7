"""The loop's stages, one module each, each a function of the config (and the iteration) that reads the earlier
stages' outputs from the run directory and writes its own atomically (spa.io.Layout):

  sft        run_sft(cfg)                 demonstrations -> sft/model (pi_init)
  generate   run_generate(cfg, i)         pi_{i-1} samples K responses per prompt -> iter_<i>/samples.jsonl
  judge      run_judge(cfg, i)            the judge (spa.judges) + pair selection (spa.select) -> iter_<i>/pairs.jsonl
  train      run_train(cfg, i)            DPO / the self-refined loss (spa.trainer) -> iter_<i>/model
  validate   run_validate(cfg, i)         iter_<i>/model on the held-out gold pairs (spa.validation)
  eval       run_eval(cfg, i)             iter_<i>/model against SFT with the gold oracle -> iter_<i>/eval.json

spa.loop runs them in order and resumes at the first stage whose output is missing.
"""
