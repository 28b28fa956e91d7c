// Trains a cell-type classifier head (and the top encoder layers) on every aligned sample given; their
// cells without a label are left out. The classifier directory is a full checkpoint plus the head, so
// EMBED uses it as its checkpoint.
process FINETUNE {
    tag "${h5ads.size()} samples"
    label 'process_gpu'

    input:
    path h5ads, stageAs: 'inputs/*', arity: '1..*'
    path checkpoint, stageAs: 'base/*'
    path vocab
    val label_key
    env('SCFM_PIPELINE_SESSION')

    output:
    path 'classifier', emit: classifier
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    scfm-finetune \\
        ${h5ads.join(' ')} \\
        -o classifier \\
        --checkpoint '${checkpoint}' \\
        --version ${params.model_version} \\
        --vocab '${vocab}' \\
        --label-key '${label_key}' \\
        --unfreeze-layers ${params.unfreeze_layers} \\
        --epochs ${params.epochs} \\
        --batch-size ${params.finetune_batch_size} \\
        --lr ${params.finetune_lr} \\
        --patience ${params.patience} \\
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
    mkdir classifier
    touch classifier/config.json classifier/model.safetensors classifier/labels.json classifier/head.safetensors versions.yml
    """
}
