// Gene modules of one sample's cells: mean decoder gene embeddings, Leiden modules, scores per cell, GO enrichment.
// The result directory is published under genes/ and shown as a section of the all-samples report.
process GENE_MODULES {
    tag "${meta.id}"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)
    path checkpoint, stageAs: 'base/*'
    path vocab
    path go_db, stageAs: 'go/*'
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.genes"), emit: dir
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def device = task.accelerator ? 'cuda' : 'auto'
    // without --go_db the modules are found and scored, not tested for GO terms
    def enrichment = go_db ? "--go-db '${go_db}'" : '--no-enrichment'
    // gene embeddings come from the decoder: an official .ckpt's `gene` model (ignored for a directory)
    """
    scfm-genes modules '${h5ad}' \\
        -o '${prefix}.genes' \\
        --checkpoint '${checkpoint}' \\
        --vocab '${vocab}' \\
        --version gene \\
        ${enrichment} \\
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
    mkdir '${prefix}.genes'
    touch '${prefix}.genes/gene_modules.tsv' '${prefix}.genes/gene_embeddings.h5ad' '${prefix}.genes/summary.json' versions.yml
    """
}
