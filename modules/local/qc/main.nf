// Per-sample quality control: filters cells and genes, writes the QC'd h5ad, a JSON summary and plots.
process QC {
    tag "${meta.id}"
    label 'process_medium'

    input:
    tuple val(meta), path(counts)
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.qc.h5ad"), emit: h5ad
    tuple val(meta), path("${prefix}.qc.json"), emit: summary
    tuple val(meta), path("${prefix}.qc_plots"), emit: plots
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def batch = meta.batch ? "--batch '${meta.batch}'" : ''
    """
    scfm-qc '${counts}' \\
        -o '${prefix}.qc.h5ad' \\
        --sample '${meta.id}' \\
        ${batch} \\
        --summary '${prefix}.qc.json' \\
        --plots-dir '${prefix}.qc_plots' \\
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
    touch '${prefix}.qc.h5ad' '${prefix}.qc.json' versions.yml
    mkdir '${prefix}.qc_plots'
    """
}
