// Builds the gene vocabulary (token order) from every QC'd sample; used when pretraining from scratch.
process VOCAB_BUILD {
    tag "${h5ads.size()} samples"
    label 'process_low'

    input:
    path h5ads, stageAs: 'qc/*', arity: '1..*'
    env('SCFM_PIPELINE_SESSION')

    output:
    path 'vocab.tsv', emit: vocab
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    scfm-vocab build \\
        ${h5ads.join(' ')} \\
        -o vocab.tsv \\
        --min-cells ${params.vocab_min_cells} \\
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
    """
    touch vocab.tsv versions.yml
    """
}
