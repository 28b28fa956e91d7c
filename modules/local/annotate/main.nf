// Cell-type labels and confidences from a fine-tuned classifier or by kNN transfer from a reference.
process ANNOTATE {
    tag "${meta.id}"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)
    path classifier, stageAs: 'classifier/*'
    path reference, stageAs: 'reference/*'
    env('SCFM_PIPELINE_SESSION')

    output:
    tuple val(meta), path("${prefix}.annotated.h5ad"), emit: h5ad
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def source = classifier
        ? "--classifier '${classifier}'"
        : "--reference '${reference}' --label-key '${params.label_key}'"
    """
    scfm-annotate '${h5ad}' \\
        -o '${prefix}.annotated.h5ad' \\
        ${source} \\
        --min-confidence ${params.min_confidence} \\
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
    touch '${prefix}.annotated.h5ad' versions.yml
    """
}
