// Gene modules of one sample's cells: mean decoder gene embeddings, Leiden modules, scores per cell, GO enrichment.
process GENE_MODULES {
    tag "${meta.id}"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)
    path checkpoint, stageAs: 'model/*'
    path vocab
    path go_db, stageAs: 'go/*'
    tuple env('MLFLOW_TRACKING_URI'), env('SCFM_MLFLOW_PARENT_RUN_ID')

    output:
    tuple val(meta), path("${prefix}.genes"), emit: dir
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def device = task.accelerator ? 'cuda' : 'auto'
    // without --go_db the modules are found and scored, not tested for GO terms
    def enrichment = go_db ? "--go-db '${go_db}'" : '--no-enrichment'
    def groupby = params.gene_modules_groupby ? "--groupby '${params.gene_modules_groupby}'" : ''
    """
    scfm-genes modules '${h5ad}' \\
        -o '${prefix}.genes' \\
        --checkpoint '${checkpoint}' \\
        --vocab '${vocab}' \\
        ${groupby} \\
        ${enrichment} \\
        --resolution ${params.gene_modules_resolution} \\
        --device ${device} \\
        --precision ${params.precision} \\
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
    mkdir '${prefix}.genes'
    touch versions.yml
    """
}
