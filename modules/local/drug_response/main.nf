// Per-cell drug sensitivity from a model of `scfm drug adapt`: obs['scfm_<drug>_sensitivity'] (optional step).
process DRUG_RESPONSE {
    tag "${meta.id}"
    label 'process_low'

    input:
    tuple val(meta), path(h5ad)
    path drug_model, stageAs: 'drug_model/*'
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.drug.h5ad"), emit: h5ad
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def drugs = params.drugs ? "--drugs '${params.drugs}'" : ''
    """
    scfm-drug score '${h5ad}' \\
        -o '${prefix}.drug.h5ad' \\
        --model '${drug_model}' \\
        ${drugs} \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        rdkit: \$(python3 -c 'from importlib.metadata import version; print(version("rdkit"))')
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch '${prefix}.drug.h5ad' versions.yml
    """
}
