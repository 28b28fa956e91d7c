// Perturbation response: cross-validates a GEARS-style predictor by target gene on every aligned sample
// (cells grouped by --perturbation_key), then fits it on all perturbations. The predictor directory holds
// evaluation.json, cv_predictions.h5ad, plots/ and report.html; REPORT_ALL adds its section.
process PERTURB {
    tag "${h5ads.size()} samples"
    label 'process_medium'

    input:
    path h5ads, stageAs: 'inputs/*', arity: '1..*'
    path checkpoint, stageAs: 'base/*'
    path vocab
    path gene_graph, stageAs: 'graph/*'
    env('SCFM_PIPELINE_SESSION')

    output:
    path 'perturb', emit: predictor
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    def target = params.perturbation_target_key ? "--target-key '${params.perturbation_target_key}'" : ''
    def graph = gene_graph ? "--gene-graph '${gene_graph}'" : ''
    // gene context embeddings come from the decoder: an official .ckpt's `gene` model (ignored for a directory)
    """
    scfm-perturb train \\
        ${h5ads.join(' ')} \\
        -o perturb \\
        --checkpoint '${checkpoint}' \\
        --vocab '${vocab}' \\
        --version gene \\
        --perturbation-key '${params.perturbation_key}' \\
        --control '${params.perturbation_control}' \\
        ${target} \\
        ${graph} \\
        --gene-features ${params.perturbation_features} \\
        --min-cells ${params.perturbation_min_cells} \\
        --folds ${params.perturbation_folds} \\
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
    mkdir perturb
    touch perturb/predictor.json perturb/predictor.safetensors perturb/evaluation.json versions.yml
    """
}
