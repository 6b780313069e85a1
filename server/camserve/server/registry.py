"""The models this server hosts, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from camserve.server.metrics import Metrics
from camserve.server.runtime import ModelRuntime
from camserve.server.settings import Settings


def unknown_model_message(name: str, hosted: Iterable[str]) -> str:
    """What a request naming a model this server does not host is told (in either layout)."""
    return f"model: {name!r} is not hosted here; available: {', '.join(hosted)}"


class UnknownModel(KeyError):
    """A model name the server does not host."""


class ModelRegistry:
    """Owns one `ModelRuntime` per configured model; the first one is the default."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_health: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._runtimes = {
            spec.name: ModelRuntime(spec, metrics, on_health) for spec in settings.models
        }
        self._default = settings.default_model_name
        self._metrics = metrics
        self._warmup = settings.warmup

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._runtimes.values())

    def get(self, name: str) -> ModelRuntime:
        """The named model, or the default one for an empty name."""
        try:
            return self._runtimes[name or self._default]
        except KeyError:
            raise UnknownModel(unknown_model_message(name, self._runtimes)) from None

    def load_all(self) -> None:
        """Loads and warms every model (blocking; run off the event loop)."""
        for runtime in self:
            runtime.load(self._warmup)

    def start_all(self) -> None:
        for runtime in self:
            runtime.start()
            self._metrics.model_ready.labels(runtime.spec.name).set(1)

    async def close_all(self) -> None:
        for runtime in self:
            await runtime.close()
            self._metrics.model_ready.labels(runtime.spec.name).set(0)
