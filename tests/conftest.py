"""Suite-wide settings."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models train several times faster on one torch thread than on two contended ones (and
    search trials and `automl apply` use one thread as well)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def task():
    """The digits task, shared by every test that does not define its own ``task``."""
    from automl.tasks import get_task

    return get_task("digits")


@pytest.fixture(scope="session")
def trained_cnn(task):
    """The digits CNN trained in float for a few epochs (about 97% validation accuracy). Tests copy it."""
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 16, "depth": 2})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(5):
        task.train_epoch(model, opt, task.train_loader(32, epoch))
    return model.eval()
