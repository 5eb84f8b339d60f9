"""Shared by the tests that launch `torchrun`: a free loopback port and the options of a run
small enough for a test (2-layer width-64 model, a few steps, a few tasks)."""
import socket

SMALL = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--model.num_layers", "2",
         "--sft.batch_size", "4", "--sft.steps", "2", "--rollout.batch_size", "2", "--rollout.group_size", "2",
         "--rollout.max_new_tokens", "32", "--env.eval_tasks", "2", "--env.eval_objectives", "1,2",
         "--trainer.save_every", "1", "--logging.progress_bar", "false", "--optimizer.lr", "1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
