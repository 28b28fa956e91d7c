// Cell (or gene) embeddings for one aligned sample into obsm['X_scfm'].
process EMBED {
    tag "${meta.id}"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)
    path checkpoint, stageAs: 'model/*'
    path vocab
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.embedded.h5ad"), emit: h5ad
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def device = task.accelerator ? 'cuda' : 'auto'
    """
    scfm-embed '${h5ad}' \\
        -o '${prefix}.embedded.h5ad' \\
        --checkpoint '${checkpoint}' \\
        --vocab '${vocab}' \\
        --output-type ${params.output_type} \\
        --pool ${params.pool} \\
        --target-depth ${params.target_depth} \\
        --pre-normalized ${params.pre_normalized} \\
        --version ${params.model_version} \\
        --batch-size ${params.embed_batch_size} \\
        --device ${device} \\
        --precision ${params.precision} \\
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
    touch '${prefix}.embedded.h5ad' versions.yml
    """
}
