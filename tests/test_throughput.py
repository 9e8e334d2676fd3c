"""Throughput of the participant level: field-of-view-independent registration, the template computed once per
process, bounded threads and per-node resource records, node resources and the GPU path (device selection and
GPU nodes), all checked on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nipype.interfaces import utility as niu

from bids_siamese.interfaces.base import StepInterface, limit_torch_threads, peak_rss_gb, reset_peak_rss
from bids_siamese.preproc import register
from bids_siamese.preproc.register import crop_to_mask, register_affine
from bids_siamese.resources import template_brain_path


def _brain(shape=(40, 44, 38), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random 'brain' inside an ellipsoid, its mask, and a 2 mm affine."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((idx[a] - centre[a]) / (shape[a] * 0.35)) ** 2 for a in range(3)))
    mask = r < 1
    data = (ndimage.gaussian_filter(rng.normal(size=shape), 2) * 50 + 100).astype(np.float32) * mask
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -centre * 2
    return data, mask, affine


def _pad(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, before, after, fill=0.0):
    """The same scan with a larger field of view (voxels around the brain filled with ``fill``)."""
    pad = list(zip(before, after))
    big = np.pad(data, pad, constant_values=fill).astype(np.float32)
    big_mask = np.pad(mask, pad)
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(before)
    return big, big_mask, affine @ shift


def test_crop_to_mask_is_the_same_box_whatever_the_field_of_view():
    data, mask, affine = _brain()
    spacings = [8.0, 4.0, 2.0]
    small = crop_to_mask(data, mask, affine, spacings)
    big = crop_to_mask(*_pad(data, mask, affine, (13, 5, 21), (30, 2, 7), fill=500.0), spacings)
    np.testing.assert_array_equal(small[0], big[0])  # outside the mask is 0, whatever was there
    np.testing.assert_array_equal(small[1], big[1])
    np.testing.assert_allclose(small[2], big[2], atol=1e-9)  # the same world position
    # whole kernels (4 voxels of 2 mm at 8 mm) and nothing but the brain's box
    assert all(n % 4 == 0 or n == s for n, s in zip(small[0].shape, data.shape))
    assert small[0].size < data.size
    hits = np.argwhere(small[1])
    assert (hits.min(axis=0) == 0).all()


def test_registration_result_does_not_depend_on_the_field_of_view():
    tpl = nib.load(template_brain_path())
    k = 4  # a 4 mm template keeps this test fast
    t = tpl.get_fdata(dtype=np.float32)
    shape = [s // k * k for s in t.shape]
    t = t[: shape[0], : shape[1], : shape[2]].reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k)
    fixed = nib.Nifti1Image(t.mean(axis=(1, 3, 5)), tpl.affine @ np.diag([k, k, k, 1.0]))
    # the subject: the template itself, shifted by 6 mm, in a tight and in a large field of view
    moving = fixed.get_fdata(dtype=np.float32)
    mask = moving > 1.0
    affine = fixed.affine.copy()
    affine[:3, 3] += [6.0, -4.0, 2.0]
    results = []
    for before, after in (((0, 0, 0), (0, 0, 0)), ((7, 3, 11), (19, 1, 5))):
        data, m, aff = _pad(moving, mask, affine, before, after, fill=300.0)
        results.append(register_affine(nib.Nifti1Image(data, aff), m, fixed, resolution=8.0, seed=0, n_threads=1))
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    assert np.abs(results[0][:3, 3] - [6.0, -4.0, 2.0]).max() < 1.5  # and it is right


def test_template_side_is_computed_once_per_process_and_equals_the_uncached_one():
    data, mask, affine = _brain(shape=(60, 72, 60))
    data = data * 0 + np.where(mask, 80.0, 0).astype(np.float32)
    moving = nib.Nifti1Image(data, affine @ np.diag([1.5, 1.5, 1.5, 1]))
    register._fixed_data_cached.cache_clear()
    first = register_affine(moving, mask, nib.load(template_brain_path()), resolution=8.0, n_threads=1)
    second = register_affine(moving, mask, nib.load(template_brain_path()), resolution=8.0, n_threads=1)
    info = register._fixed_data_cached.cache_info()
    assert info.misses == 1 and info.hits == 1
    # an in-memory template (no file) takes the uncached path: the same numbers
    tpl = nib.load(template_brain_path())
    in_memory = nib.Nifti1Image(tpl.get_fdata(dtype=np.float32), tpl.affine)
    third = register_affine(moving, mask, in_memory, resolution=8.0, n_threads=1)
    assert register._fixed_data_cached.cache_info().misses == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


def test_step_interface_bounds_torch_threads_and_records_cpu_and_memory(tmp_path, monkeypatch):
    from nipype.interfaces.base import BaseInterfaceInputSpec, TraitedSpec, traits

    class _In(BaseInterfaceInputSpec):
        num_threads = traits.Int(1, usedefault=True)

    class _Out(TraitedSpec):
        threads = traits.Int()

    class Busy(StepInterface):
        input_spec = _In
        output_spec = _Out

        def _run_step(self, runtime):
            self._results["threads"] = torch.get_num_threads()
            block = np.ones(30_000_000)  # 240 MB for the peak
            float(block.sum())
            return runtime

    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what a previous node in a reused worker may have left
        result = Busy().run()
        assert result.outputs.threads == 1
        assert Busy(num_threads=2).run().outputs.threads == 2
    finally:
        torch.set_num_threads(previous)
    assert result.runtime.cpu_seconds > 0
    if reset_peak_rss():  # Linux: the peak is this node's, and includes the 240 MB array
        assert result.runtime.peak_rss_gb >= 0.2
    assert peak_rss_gb() > 0


def test_limit_torch_threads_never_goes_below_one():
    previous = torch.get_num_threads()
    try:
        limit_torch_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def _settings(tmp_path: Path, device: str, **kw):
    from bids_siamese.config import Settings

    base = dict(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="participant",
                work_dir=tmp_path / "work", device=device, nprocs=4, omp_nthreads=4, mem_gb=8.0)
    base.update(kw)
    return Settings(**base)


def _scan_wf(tmp_path: Path, device: str):
    from bids_siamese.bids.layout import T1wScan
    from bids_siamese.workflows.scan import init_scan_wf

    scan = T1wScan(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", {"subject": "01"})
    return init_scan_wf(scan, _settings(tmp_path, device))


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_torch_nodes_declare_their_device_threads_and_gpu_use(tmp_path, device):
    wf = _scan_wf(tmp_path, device)
    gpu = device.startswith("cuda")
    nodes = {name: wf.get_node(name) for name in ("preproc_wf.brain_extraction", "preproc_wf.register",
                                                  "orientation_qc_wf.register_shear_free")}
    for name, node in nodes.items():
        assert node.inputs.device == device
        assert node.is_gpu_node() is gpu  # MultiProc counts it against n_gpu_procs
        assert node.n_procs == node.inputs.num_threads  # never more threads than the slots it holds
    assert nodes["preproc_wf.brain_extraction"].n_procs == (1 if gpu else 4)  # on a GPU its CPU part is one thread
    assert nodes["preproc_wf.register"].n_procs == nodes["orientation_qc_wf.register_shear_free"].n_procs == 1
    for name in ("preproc_wf.conform", "preproc_wf.model_grid", "orientation_qc_wf.orientation",
                 "orientation_qc_wf.figures", "asymmetry_wf.asymmetry"):
        node = wf.get_node(name)
        assert not node.is_gpu_node() and node.n_procs == 1 and node.mem_gb > 0


def test_plugin_settings_reuse_workers_and_limit_gpu_nodes(tmp_path):
    from bids_siamese.workflows.participant import GPU_NODES, plugin_settings

    plugin, args = plugin_settings(_settings(tmp_path, "cpu"))
    assert plugin == "MultiProc" and args["n_procs"] == 4 and args["memory_gb"] == 8.0
    assert "maxtasksperchild" not in args and "n_gpu_procs" not in args
    plugin, args = plugin_settings(_settings(tmp_path, "cuda"))
    assert args["n_gpu_procs"] == GPU_NODES and args["mp_context"] == "forkserver"
    assert plugin_settings(_settings(tmp_path, "cpu", nprocs=1)) == ("Linear", {})


def test_multiproc_runs_at_most_n_gpu_procs_gpu_nodes_at_once(tmp_path):
    """nipype's scheduler with our plugin arguments: GPU nodes beyond n_gpu_procs wait (no GPU needed)."""
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    from bids_siamese.workflows.participant import GPU_NODES, plugin_settings

    _, args = plugin_settings(_settings(tmp_path, "cuda"))
    args.pop("mp_context")
    plugin = MultiProcPlugin(plugin_args=args)
    try:
        wf = _scan_wf(tmp_path, "cuda")
        gpu_nodes = [wf.get_node(n) for n in ("preproc_wf.brain_extraction", "preproc_wf.register",
                                              "orientation_qc_wf.register_shear_free")]
        plugin.procs = gpu_nodes + gpu_nodes  # six GPU nodes, each holding one CPU and one GPU slot
        running = [(None, jobid) for jobid in range(GPU_NODES)]
        free_memory, free_cpus, free_gpu = plugin._check_resources(running)
        assert free_gpu == 0 and free_cpus == 4 - GPU_NODES  # CPUs are left, GPU slots are not
        assert plugin._check_resources(running[:1])[2] == GPU_NODES - 1
    finally:
        plugin.pool.shutdown()


def test_cuda_device_check_does_not_poison_forked_workers(monkeypatch):
    from bids_siamese.cli.parser import resolve_device
    from bids_siamese.errors import UsageError

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answer")
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert resolve_device("auto") == "cpu"


def test_run_participant_freezes_the_scheduler_heap_during_the_run(tmp_path, monkeypatch):
    """MultiProc's gc.collect() calls must not rescan the main process's whole heap 5 times a second."""
    import gc

    from nipype.pipeline import engine as pe

    from bids_siamese.workflows import participant

    seen = {}

    def fake_run(self, plugin=None, plugin_args=None, **kw):
        seen["frozen"] = gc.get_freeze_count()
        seen["plugin"] = plugin

    monkeypatch.setattr(pe.Workflow, "run", fake_run)
    monkeypatch.setattr(participant, "write_reports", lambda settings, scans, failures: [])
    settings = _settings(tmp_path, "cpu", nprocs=2)
    assert participant.run_participant(settings, []) == []
    # MultiProc, as the plugin that survives a dead worker (workflows/plugin.py)
    assert type(seen["plugin"]).__name__ == "SafeMultiProcPlugin" and seen["frozen"] > 1000
    assert gc.get_freeze_count() == 0  # unfrozen afterwards


@pytest.mark.parametrize("device, nprocs, warmed", [("cpu", 2, True), ("cpu", 1, False), ("cuda", 2, False)])
def test_worker_caches_are_built_before_forking_only_for_forked_workers(tmp_path, monkeypatch, device, nprocs,
                                                                         warmed):
    from nipype.pipeline import engine as pe

    from bids_siamese.bids.layout import T1wScan
    from bids_siamese.workflows import participant

    calls = []
    monkeypatch.setattr(pe.Workflow, "run", lambda self, plugin=None, plugin_args=None, **kw: None)
    monkeypatch.setattr(participant, "write_reports", lambda settings, scans, failures: [])
    monkeypatch.setattr(participant, "warm_worker_caches", lambda resolution, atlas: calls.append(resolution))
    scan = T1wScan(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", {"subject": "01"})
    failures = participant.run_participant(_settings(tmp_path, device, nprocs=nprocs), [scan])
    assert [failure.name for failure in failures] == ["sub-01_T1w"]  # nothing ran
    assert len(calls) == int(warmed)


def test_warm_worker_caches_fills_the_caches_the_nodes_use(monkeypatch):
    """The template on the grid, the atlas and the template's asymmetry are built once, before the fork, by the
    cached functions the nodes call. (The registration's template side waits for a public function in
    preproc/register.py: each worker builds it.)"""
    from bids_siamese.atlas import atlas_on_grid
    from bids_siamese.interfaces.symmetry import DEFAULT_FWHM
    from bids_siamese.symmetry.analysis import template_reference
    from bids_siamese.workflows import participant

    participant.warm_worker_caches(8.0, "harvard_oxford")
    assert atlas_on_grid("harvard_oxford", 8.0)[0] is atlas_on_grid("harvard_oxford", 8.0)[0]  # cached
    assert template_reference(8.0, DEFAULT_FWHM, "harvard_oxford") is template_reference(8.0, DEFAULT_FWHM,
                                                                                         "harvard_oxford")
    calls = []
    for name in ("template_on_grid", "atlas_on_grid", "template_reference"):
        monkeypatch.setattr(participant, name, lambda *args, _name=name: calls.append((_name, args)))
    participant.warm_worker_caches(8.0, "harvard_oxford")
    assert [name for name, _ in calls] == ["template_on_grid", "atlas_on_grid", "template_reference"]
    assert calls[1][1] == ("harvard_oxford", 8.0) and calls[2][1] == (8.0, DEFAULT_FWHM, "harvard_oxford")


def test_only_nodes_reading_work_files_hash_by_timestamp(tmp_path):
    wf = _scan_wf(tmp_path, "cpu")
    timestamp = {"brain_extraction", "register", "register_shear_free", "model_grid", "orientation", "figures",
                 "merge_figures", "write_derivatives", "asymmetry"}
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if isinstance(node.interface, niu.IdentityInterface):  # inputnode/outputnode: nipype removes them
            continue
        method = (node.config or {}).get("execution", {}).get("hash_method")
        # check_header and conform read the BIDS file: they keep the run's content hashing
        assert (method == "timestamp") is (name.split(".")[-1] in timestamp), name


def _same(f):
    return f


def test_a_node_timestamp_setting_overrides_the_workflow_content_hashing(tmp_path):
    """nipype merges the run's config into each node's, the node's own value winning."""
    from nipype.pipeline import engine as pe

    src = tmp_path / "in.txt"
    src.write_text("x")
    wf = pe.Workflow(name="w", base_dir=str(tmp_path / "work"))
    a = pe.Node(niu.IdentityInterface(fields=["f"]), name="a")
    b = pe.Node(niu.Function(input_names=["f"], output_names=["f"], function=_same), name="b")
    c = pe.Node(niu.Function(input_names=["f"], output_names=["f"], function=_same), name="c")
    a.inputs.f = str(src)
    wf.connect([(a, b, [("f", "f")]), (b, c, [("f", "f")])])
    b.config = {"execution": {"hash_method": "timestamp"}}
    wf.config["execution"] = {"hash_method": "content", "crashdump_dir": str(tmp_path)}
    nodes = {n.name: n for n in wf.run(plugin="Linear").nodes()}
    assert nodes["b"].config["execution"]["hash_method"] == "timestamp"
    assert nodes["c"].config["execution"]["hash_method"] == "content"


def test_the_asymmetry_node_holds_the_threads_of_its_symmetry_model(tmp_path, monkeypatch):
    from bids_siamese.bids.layout import T1wScan
    from bids_siamese.workflows import scan as scan_wf

    scan = T1wScan(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", {"subject": "01"})
    monkeypatch.setattr(scan_wf, "model_task", lambda model: "symmetry")
    node = scan_wf.init_scan_wf(scan, _settings(tmp_path, "cpu", model=tmp_path / "m")).get_node(
        "asymmetry_wf.asymmetry")
    assert node.inputs.num_threads == node.n_procs == 4
    monkeypatch.setattr(scan_wf, "model_task", lambda model: None)
    node = scan_wf.init_scan_wf(scan, _settings(tmp_path, "cpu")).get_node("asymmetry_wf.asymmetry")
    assert node.inputs.num_threads == node.n_procs == 1


def _train_throughput_module():
    """``benchmarks/train_throughput.py`` (a script, not part of the package)."""
    import importlib.util
    import sys

    if "train_throughput" not in sys.modules:
        path = Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"
        spec = importlib.util.spec_from_file_location("train_throughput", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_throughput"] = module  # its dataclass looks its module up
        spec.loader.exec_module(module)
    return sys.modules["train_throughput"]


def test_training_throughput_counts_flops_and_volumes_per_second_on_cpu(capsys):
    import re

    bench = _train_throughput_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figs = bench.run_training_section(["small", "resnet18"], resolution=8.0, batch=2, device="cpu", steps=1,
                                          warmup=0, channels_last=False, compile_model=False, peak_tflops=None)
    finally:
        torch.set_num_threads(threads)
    small, resnet = figs
    assert small.shape == resnet.shape == (21, 26, 22)  # the 8 mm model grid
    for fig in figs:
        assert fig.batch == 2 and fig.precision == "fp32" and fig.device == "cpu"
        assert fig.volumes_per_second > 0 and fig.seconds_per_step > 0
        assert fig.volumes_per_second == pytest.approx(2 / fig.seconds_per_step)
        assert fig.flops_per_step > 0
    assert resnet.flops_per_step > 5 * small.flops_per_step  # the bigger backbone does more arithmetic
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    pattern = (r"training (small|resnet18) +batch 2 on 21x26x22 cpu fp32 \(eager\): +[0-9.]+ volumes/s, "
               r"[0-9.]+ s/step \(median of 1\), [0-9.]+ GFLOP/step, [0-9.]+ TFLOP/s \(CPU: no peak fraction\)")
    assert all(re.fullmatch(pattern, line) for line in lines), lines


def test_training_flops_do_not_depend_on_the_batch_layout_and_the_peak_table():
    bench = _train_throughput_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, last = (bench.measure_training_step("regional_cnn", 8.0, 2, "cpu", steps=1, warmup=0,
                                                   channels_last=cl) for cl in (False, True))
        double = bench.measure_training_step("regional_cnn", 8.0, 4, "cpu", steps=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    assert plain.flops_per_step == last.flops_per_step > 0  # channels_last_3d changes the layout, not the work
    assert double.flops_per_step == pytest.approx(2 * plain.flops_per_step, rel=0.05)
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert bench.bf16_peak_tflops("NVIDIA GeForce GTX 1080") is None
    fig = bench.StepFigures("small", 8, (84, 104, 88), "cuda:0", "bf16 autocast", True, False, 100.0, 0.08,
                            8e12, 5)
    assert fig.tflops_per_second == pytest.approx(100.0)
    assert bench.figure_line(fig, 989.0, "NVIDIA H200").endswith("10.11% of the 989 TFLOP/s bf16 dense peak")
    assert "unknown" in bench.figure_line(fig, None, "NVIDIA GeForce GTX 1080")


@pytest.mark.parametrize("backbone", ["small", "regional_cnn"])
def test_training_with_channels_last_3d_weights_matches_the_contiguous_one_on_cpu(backbone, tmp_path):
    """On CUDA the training loop gives the model channels_last_3d weights; the same run with such weights on the
    CPU trains to the same weights and history, and its checkpoint loads into a contiguous model."""
    from bids_siamese.train.loop import TwinData, train_twin
    from bids_siamese.train.trainer import TrainConfig, setup_training

    bench = _train_throughput_module()
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(8, 1, 21, 26, 22)).astype(np.float32)  # the 8 mm model grid
    family = np.repeat(np.arange(5), [2, 2, 2, 1, 1])
    positive = np.zeros((8, 8), np.float32)
    for a in (0, 2, 4):
        positive[a, a + 1] = positive[a + 1, a] = 1.0
    data = TwinData(vols, family, positive, family[:, None] != family[None, :])
    config = TrainConfig(epochs=2, batch_size=4, patience=5, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = bench.twin_model(backbone, 8.0)
        setup_training(plain, config, "cpu", None)  # the CPU keeps the contiguous layout
        assert all(p.is_contiguous() for p in plain.parameters())
        last = bench.twin_model(backbone, 8.0).to(memory_format=torch.channels_last_3d)
        conv_weights = [p for p in last.parameters() if p.dim() == 5 and p.shape[1] > 1]
        assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
                                    for p in conv_weights)
        runs = [train_twin(m, data, np.arange(6), np.arange(6, 8), config, "cpu") for m in (plain, last)]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(runs[0].history["train_loss"], runs[1].history["train_loss"], rtol=1e-4, atol=1e-6)
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-4)  # AdamW scales tiny gradient differences up
    torch.save(b, tmp_path / "weights.pt")
    fresh = bench.twin_model(backbone, 8.0)
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt"))
    assert all(p.is_contiguous() for p in fresh.parameters())
    torch.testing.assert_close(fresh.state_dict(), a, rtol=1e-3, atol=2e-4)
