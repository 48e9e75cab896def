"""The naive way: a Flask app calling the Keras model's ``model.predict`` on each request.

As Keras' and Flask's own examples serve an image classifier: the model is loaded
once per process, each request decodes its one image, and ``model.predict`` runs on
a batch of one; gunicorn's sync workers give one request per process at a time.
``MODEL_DIR`` is the version directory; the Keras copy is its
``assets.extra/model.keras`` (the SavedModel's own weights).

    gunicorn -w 2 -b 127.0.0.1:8000 'app:create_app()'
"""

from __future__ import annotations

import os

import common
import numpy as np
from flask import Flask, jsonify, request


def create_app() -> Flask:
    model_dir = os.environ["MODEL_DIR"]
    card = common.read_card(model_dir)
    labels = list(card["labels"])
    model = common.load_keras(model_dir)
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict():
        # A form upload's "image" field, or the raw body.
        upload = request.files.get("image")
        data = upload.read() if upload is not None else request.get_data()
        if not data:
            return jsonify(error="no image"), 400
        x = common.preprocess(data, card)[None]
        logits = model.predict(x, verbose=0)[0]
        scores = np.exp(logits - logits.max())
        return jsonify(common.answer(scores / scores.sum(), labels))

    return app
