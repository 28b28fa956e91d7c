// Read-depth-aware masked pretraining with DeepSpeed ZeRO on every sample's Parquet shards.
//
// All GPUs of one task train together: with `accelerator N` (conf/gpu.config, --pretrain_gpus) the
// command runs under `torchrun --nproc_per_node N`. With --pretrain_nodes > 1 (Slurm only, see
// conf/slurm.config) the job spans several nodes and `srun` starts one rank per GPU instead.
//
// The run directory (ZeRO checkpoints, logs) lives outside the work directory, under
// --pretrain_runs_dir (default <outdir>/pretrain/runs), in a folder named after what the run's math
// depends on: the shards (names and sizes), the vocabulary and the settings `scfm-pretrain` refuses to
// change on resume. A retry after preemption, or a later run with -resume or a larger --max_steps,
// finds that folder and continues from its newest complete checkpoint; different data or settings get
// a new folder. A preempted run exits 75 (also under torchrun, which reports 1 for its workers).
process PRETRAIN {
    tag "${shards.size()} shard dirs"
    label 'process_gpu'

    input:
    path shards, stageAs: 'shards/*', arity: '1..*'
    path vocab
    path init_checkpoint, stageAs: 'init/*'
    tuple env('MLFLOW_TRACKING_URI'), env('SCFM_MLFLOW_PARENT_RUN_ID')

    output:
    // a link to the run directory (ZeRO checkpoints for --resume, logs, curves) and the final model in it
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
    // absolute: the task runs in its own work directory (a shared file system, not object storage)
    def runs_dir = file(params.pretrain_runs_dir ?: "${params.outdir}/pretrain/runs").toAbsolutePath()
    def identity = [params.model_preset, init_checkpoint ?: '', params.zero_stage, params.deepspeed_config ?: '',
                    params.micro_batch_size, params.grad_accum, params.seed, gpus, params.pretrain_nodes, args].join(' ').replace("'", '')
    """
    run_key=\$( { stat -L -c '%n %s' shards/*/*; cat '${vocab}'; echo '${identity}'; } | sha256sum | cut -c1-16 )
    run_dir='${runs_dir}'/\${run_key}
    mkdir -p '${runs_dir}'
    status=0
    ${launcher} scfm-pretrain \\
        ${shard_flags} \\
        -o "\${run_dir}" \\
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
        ${args} || status=\$?
    if [ -f "\${run_dir}/PREEMPTED" ]; then
        echo "pretraining was stopped after saving a checkpoint in \${run_dir}; a retry continues it" >&2
        exit 75
    fi
    [ \$status -eq 0 ] || exit \$status
    ln -sfn "\${run_dir}" pretrain_run

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
