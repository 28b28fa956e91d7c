// Read-depth-aware masked pretraining with DeepSpeed ZeRO on every sample's Parquet shards.
//
// All GPUs of one task train together: with `accelerator N` (conf/gpu.config, --pretrain_gpus) the
// command runs under `torchrun --nproc_per_node N`. With --pretrain_nodes > 1 (Slurm only, see
// conf/slurm.config) the job spans several nodes and `srun` starts one rank per GPU instead.
process PRETRAIN {
    tag "${shards.size()} shard dirs"
    label 'process_gpu'

    input:
    path shards, stageAs: 'shards/*', arity: '1..*'
    path vocab
    path init_checkpoint, stageAs: 'init/*'
    tuple env('MLFLOW_TRACKING_URI'), env('SCFM_MLFLOW_PARENT_RUN_ID')

    output:
    // the run directory (ZeRO checkpoints for --resume, logs, curves) and the final model inside it
    path 'pretrain_run', emit: run
    path 'pretrain_run/model', emit: checkpoint
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    def gpus = task.accelerator ? task.accelerator.request as int : 0
    def launcher = ''
    if (params.pretrain_nodes > 1) {
        launcher = 'srun --kill-on-bad-exit=1'
    }
    else if (gpus > 1) {
        launcher = "torchrun --standalone --nnodes 1 --nproc_per_node ${gpus} --no-python"
    }
    def shard_flags = shards.collect { dir -> "--shards '${dir}'" }.join(' ')
    def init = init_checkpoint ? "--init-checkpoint '${init_checkpoint}'" : ''
    def ds_config = params.deepspeed_config ? "--deepspeed-config '${params.deepspeed_config}'" : ''
    """
    ${launcher} scfm-pretrain \\
        ${shard_flags} \\
        -o pretrain_run \\
        --vocab '${vocab}' \\
        --model-preset ${params.model_preset} \\
        ${init} \\
        --zero-stage ${params.zero_stage} \\
        ${ds_config} \\
        --micro-batch-size ${params.micro_batch_size} \\
        --grad-accum ${params.grad_accum} \\
        --max-steps ${params.max_steps} \\
        --lr ${params.pretrain_lr} \\
        --warmup-steps ${params.warmup_steps} \\
        --save-every ${params.save_every} \\
        --seed ${params.seed} \\
        --quiet \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
        deepspeed: \$(python3 -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null)
    END_VERSIONS
    """

    stub:
    """
    mkdir -p pretrain_run/model
    touch pretrain_run/model/config.json pretrain_run/model/model.safetensors pretrain_run/model/vocab.tsv versions.yml
    """
}
