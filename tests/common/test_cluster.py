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
