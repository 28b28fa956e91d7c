// Ends the pipeline's parent MLflow run (FINISHED) once every report is written. Its inputs are the
// reports, so a -resume that changes nothing leaves it cached, and one that adds a batch ends the
// parent run again after the new reports.
process MLFLOW_FINISH {
    tag "${session_id}"
    label 'process_single'

    input:
    val session_id
    path reports, stageAs: 'reports/*'

    output:
    path 'versions.yml', emit: versions

    script:
    """
    scfm-mlflow-finish --session-id '${session_id}' --status FINISHED

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
