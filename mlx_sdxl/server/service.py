"""The server's parts put together: configuration, models, the worker and its queue, the
progress state, preview decoders and the outputs folder. The HTTP layer (app.py) calls
only this."""

from __future__ import annotations

from .config import ServerConfig
from .jobs import Outcome, run_generation
from .models import Choice, ModelManager
from .outputs import Outputs
from .previews import Decoders
from .requests import Spec
from .state import ServerState
from .worker import Worker


class Service:
    def __init__(self, config: ServerConfig, prompt_syntax: str = "a1111"):
        self.config = config
        self.prompt_syntax = prompt_syntax
        self.state = ServerState(preview_every=config.preview_every)
        self.decoders = Decoders(config.models.taesd)
        self.worker = Worker(config.limits.max_queue)
        self.outputs = Outputs(config.outputs) if config.outputs else None
        self.models = ModelManager(config)  # reads configs only: a wrong --model fails here, before serving

    def start(self) -> None:
        self.decoders.load()  # here, in the main thread: a named TAESD that does not load fails at start
        if self.config.models.vae_decoder == "taesd":
            if self.decoders.taesd is None:
                from ..errors import WeightsError
                from ..models.taesd import TAESDXL_ID

                raise WeightsError(f"--vae-decoder taesd needs TAESDXL: pass --taesd PATH|ID (it is not in the "
                                   f"local hub cache as {TAESDXL_ID})")
        self.worker.start()

    def shutdown(self) -> None:
        """Stop the running job at its next step, drop the waiting ones, join the worker, and free the models."""
        self.worker.close()
        self.state.close()
        self.worker.join()
        self.models.release()
        self.decoders.release()

    # ---------------------------------------------------------------- jobs
    def run(self, spec: Spec) -> Outcome:
        """Run one generation request (on the worker: submit `lambda: service.run(spec)`)."""
        pipe = self.models.pipeline(spec.choice)
        outcome = run_generation(spec, pipe, self.state, self.decoders,
                                 taesd=self.config.models.vae_decoder == "taesd", metadata=self.config.metadata,
                                 prompt_syntax=self.prompt_syntax, max_megapixels=self.config.limits.max_megapixels)
        if self.outputs is not None:
            self.outputs.save(outcome.images, outcome.seeds)
        return outcome


__all__ = ["Service", "Choice"]
