"""Prediction observers and scrape-time collectors hung off the service layer.

``drift`` (BN-statistics drift windows), ``prediction_mix`` (predicted classes and
confidences), ``capture`` (sampled requests for calibration), ``auto_trigger``
(calibration on sustained drift), ``temperature`` (the calibration in service);
``wiring.attach`` sets them all up on one service.
"""
