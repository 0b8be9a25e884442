"""The registered model as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/telugu-s2s@champion")`.

The weights travel as the `bundle` artifact (serving/bundle.py) rather than as a torch.export
program: the model is stateful and streams (encoder state, KV cache, decoder state), which an
exported graph does not carry. `predict` answers whole turns through ReplySession, the
one-conversation path (the server runs the batched Engine, held to the same replies by
tests/test_serving.py); streaming callers load the bundle with serving.bundle.load_bundle instead.
Only core/, models/ and serving/ ship with it (its code_paths): it needs nothing of tasks/.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from serving.bundle import ModelBundle, load_bundle_dir
from serving.session import GenerationSettings, ReplySession


class TeluS2SModel(mlflow.pyfunc.PythonModel):
    """Input rows: audio (float samples at the model's rate), speaker, emotion. Output rows: the
    reply audio, its sample rate and the reply's text (what the text stream says it spoke; empty
    for a model without one)."""

    bundle: ModelBundle

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle_dir(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        given = dict(params or {})
        if "top_k" in given:
            given["top_k"] = given["top_k"] or None  # the signature's 0 = no top-k cut
        settings = GenerationSettings(**given)
        replies, texts = [], []
        for row in model_input.to_dict("records"):
            session = ReplySession(self.bundle, row.get("speaker", "female_young"), row.get("emotion", "neutral"),
                                   settings, seed=int(row.get("seed", 0)))
            replies.append(session.reply(np.asarray(row["audio"], dtype=np.float32)).tolist())
            texts.append(session.reply_text)
        return pd.DataFrame({"audio": replies, "sample_rate": self.bundle.sample_rate, "text": texts})
