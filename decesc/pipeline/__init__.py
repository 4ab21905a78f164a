"""The method as resumable stages in one run directory.

    config     PipelineConfig: every setting, with the metadata that says which stages read it
    stage      Stage: what a stage is (one declaration)
    sft, mine, dpo, eval   the stage families, each declaring its stages
    stages     STAGES: every stage in run order; parse_stages, upstream
    run        Run (markers, status, skip rules) and run_pipeline
    preflight  the checks before any stage starts
    lock       one writer per run directory
    models     Models: the run's base model, read once, and the copies handed out
    data       splits, examples, subsets, fingerprints of the files a stage reads
    results    intermediate files and the read-back checks of finished outputs
    training, judging   the pipeline's calls into the training layer and the judges
"""
