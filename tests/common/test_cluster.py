import os

from common.cluster import pin_local_gpu, process_place


def test_mpich_hydra_variables():
    place = process_place({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"})
    assert (place.rank, place.size, place.local_rank, place.local_size) == (5, 8, 1, 4)


def test_slurm_variables_and_defaults():
    place = process_place({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"})
    assert (place.rank, place.size, place.local_rank) == (6, 8, 2)
    assert process_place({}).size == 1


def test_pin_respects_existing_allocation(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    place = process_place({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3"})
    assert pin_local_gpu(place) == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pin_local_gpu(place) is None


def test_gpu_count_is_the_launchers_or_else_the_nodes(monkeypatch, tmp_path):
    assert process_place({}).gpus_per_node is None  # not stated: node_gpus asks nvidia-smi
    assert process_place({"SLURM_GPUS_ON_NODE": "4"}).gpus_per_node == 4
    place = process_place({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
                           "MPI_LOCALNRANKS": "2", "BIGTICKET_GPUS_PER_NODE": "4"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_local_gpu(place) == "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pin_local_gpu(place, share=True) == "2,3"  # two ranks on the node: half each
    # Nothing stated and no nvidia-smi on PATH: a CPU node, nothing pinned.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert pin_local_gpu(process_place({"PMI_RANK": "1", "PMI_SIZE": "2"})) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
