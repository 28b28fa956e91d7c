// One self-contained HTML report (and metrics JSON) over a group of samples: one per batch, one for all.
process REPORT {
    tag "${name}"
    label 'process_medium'

    input:
    tuple val(name), path(h5ads, stageAs: 'inputs/*', arity: '1..*'), path(qc_summaries, stageAs: 'qc/*', arity: '1..*')
    path perturbation, stageAs: 'perturb/*'
    path gene_modules, stageAs: 'gene_modules/*', arity: '0..*'
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(name), path("${name}.report.html"), emit: html
    tuple val(name), path("${name}.metrics.json"), emit: metrics
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    // known labels to score the embedding against, on the cells that have one; a batch of unlabelled
    // samples gets a report that says so instead of failing the run
    def label = params.report_label_key ? "--label-key '${params.report_label_key}' --labels-optional" : ''
    def qc = qc_summaries.collect { summary -> "--qc-json '${summary}'" }.join(' ')
    def perturb = perturbation ? "--perturbation '${perturbation}'" : ''
    // GENE_MODULES result directories (none unless --gene_modules): one report section each
    def genes = gene_modules.collect { dir -> "--gene-modules '${dir}'" }.join(' ')
    """
    scfm-report \\
        ${h5ads.join(' ')} \\
        -o '${name}.report.html' \\
        ${label} \\
        ${qc} \\
        ${perturb} \\
        ${genes} \\
        --batch-key ${params.batch_key} \\
        --metrics-json '${name}.metrics.json' \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        container: \${SCFM_CONTAINER:-none}
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'from importlib.metadata import version; print(version("torch"))')
    END_VERSIONS
    """

    stub:
    """
    touch '${name}.report.html' '${name}.metrics.json' versions.yml
    """
}
