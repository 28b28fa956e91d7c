// Creates the MLflow store and the pipeline's parent run before any parallel step logs into it.
// `scfm-mlflow-init` is idempotent per Nextflow session id, which `-resume` keeps: a resumed
// pipeline gets the same parent run id back, so the inputs (and cache keys) of every cached task
// are unchanged and nothing is re-run or logged twice.
process MLFLOW_INIT {
    tag "${run_name}"
    label 'process_single'
    // always re-run: it is cheap, and it recreates the parent run when the store has been removed
    cache false

    input:
    val mlflow_uri
    val run_name
    val session_id

    output:
    tuple val(mlflow_uri), env('PARENT_RUN_ID'), emit: tracking
    path 'versions.yml', emit: versions

    script:
    """
    PARENT_RUN_ID=\$(scfm-mlflow-init \\
        --mlflow-uri '${mlflow_uri}' \\
        --run-name '${run_name}' \\
        --session-id '${session_id}' | tail -n 1)

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    """
    PARENT_RUN_ID=stub-parent-run
    touch versions.yml
    """
}
