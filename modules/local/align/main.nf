// Maps a sample's genes onto the model vocabulary (Ensembl id, symbol, alias); in pretrain mode it
// also writes the Parquet shards the trainer streams from.
process ALIGN {
    tag "${meta.id}"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)
    path vocab
    path aliases, stageAs: 'aliases/*'
    val write_shards
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.aligned.h5ad"), emit: h5ad
    tuple val(meta), path("${prefix}.shards"), emit: shards, optional: true
    tuple val(meta), path("${prefix}.coverage.json"), emit: coverage
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def shard_flag = write_shards ? "--shards-dir '${task.ext.prefix ?: meta.id}.shards'" : ''
    def alias_flag = aliases ? "--aliases '${aliases}'" : ''
    """
    scfm-align '${h5ad}' \\
        -o '${prefix}.aligned.h5ad' \\
        --vocab '${vocab}' \\
        ${alias_flag} \\
        ${shard_flag} \\
        --min-coverage ${params.min_coverage} \\
        --coverage-json '${prefix}.coverage.json' \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'from importlib.metadata import version; print(version("torch"))')
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch '${prefix}.aligned.h5ad' '${prefix}.coverage.json' versions.yml
    if [ '${write_shards}' = 'true' ]; then mkdir '${prefix}.shards'; fi
    """
}
