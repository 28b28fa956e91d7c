// Creates the MLflow store and the pipeline's parent run before any parallel step logs into it.
//
// The store is MLFLOW_TRACKING_URI, exported to every task by nextflow.config. Neither the store nor
// the parent run id is an input of any task (they would be part of every cache key, so a new
// --outdir or store would re-run everything): tasks get the Nextflow session id, which -resume
// keeps, and each step finds the parent run tagged with it, creating it under the store's lock if the
// store is new. This task is cached like any other, so a -resume of a finished run executes nothing.
process MLFLOW_INIT {
    tag "${session_id}"
    label 'process_single'

    input:
    val session_id

    output:
    val session_id, emit: session
    path 'versions.yml', emit: versions

    script:
    """
    scfm-mlflow-init --session-id '${session_id}'

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        mlflow: \$(python3 -c 'from importlib.metadata import version; print(version("mlflow"))')
    END_VERSIONS
    """

    stub:
    """
    touch versions.yml
    """
}
