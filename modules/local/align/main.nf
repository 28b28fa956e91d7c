// Maps a sample's genes onto the model vocabulary (Ensembl id, symbol, alias); in pretrain mode it
// also writes the Parquet shards the trainer streams from.
process ALIGN {
    tag "${meta.id}"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)
    path vocab
    val write_shards
    tuple env('MLFLOW_TRACKING_URI'), env('SCFM_MLFLOW_PARENT_RUN_ID')

    output:
    tuple val(meta), path("${prefix}.aligned.h5ad"), emit: h5ad
    tuple val(meta), path("${prefix}.shards"), emit: shards, optional: true
    tuple val(meta), path("${prefix}.coverage.json"), emit: coverage
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def shards = write_shards ? "--shards-dir '${prefix}.shards'" : ''
    def aliases = params.aliases ? "--aliases '${params.aliases}'" : ''
    """
    scfm-align '${h5ad}' \\
        -o '${prefix}.aligned.h5ad' \\
        --vocab '${vocab}' \\
        ${aliases} \\
        ${shards} \\
        --min-coverage ${params.min_coverage} \\
        --coverage-json '${prefix}.coverage.json' \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch '${prefix}.aligned.h5ad' '${prefix}.coverage.json' versions.yml
    if [ '${write_shards}' = 'true' ]; then mkdir '${prefix}.shards'; fi
    """
}
