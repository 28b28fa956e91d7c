// TF -> target edges of one sample, ranked by the similarity of the gene embeddings GENE_MODULES wrote
// (--tf_list), published under genes/ as pySCENIC-style adjacencies.
process GENE_NETWORK {
    tag "${meta.id}"
    label 'process_low'

    input:
    tuple val(meta), path(genes, stageAs: 'genes/*')
    path tf_list
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.adjacencies.tsv"), emit: edges
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    scfm-genes network '${genes}/gene_embeddings.h5ad' \\
        -o '${prefix}.adjacencies.tsv' \\
        --tf-list '${tf_list}' \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch '${prefix}.adjacencies.tsv' versions.yml
    """
}
