// The try-it page: list the models, send a photo, show what came back.
// Paths are relative, so the page also works behind a proxy that adds a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const BOX_COLOUR = "#ff1f8e"; // stands out on most photos
let photo = null; // the last chosen File, sent again when the model changes
let latest = 0; // numbers the sends: only the newest one's answer is shown

async function loadModels() {
  const select = $("model");
  try {
    const { models } = await getJson(await fetch("v1/models"));
    const usable = models.filter((m) => m.task === "classification" || m.task === "detection");
    select.replaceChildren(...usable.map((m) => {
      const option = new Option(`${m.name} (${m.task})`, m.name);
      option.dataset.task = m.task;
      return option;
    }));
    if (!usable.length) select.replaceChildren(new Option("no models are served", ""));
    select.disabled = !usable.length;
  } catch (err) {
    select.replaceChildren(new Option("models unavailable", ""));
    showError(err);
  }
}

// The JSON body of a 2xx answer; anything else becomes an Error carrying the problem.
async function getJson(response) {
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : { detail: await response.text() };
  if (!response.ok) {
    const err = new Error(body.detail || response.statusText);
    err.problem = { status: response.status, ...body };
    throw err;
  }
  return body;
}

async function send(file) {
  const option = $("model").selectedOptions[0];
  if (!file || !option || !option.value) return;
  photo = file;
  const ticket = ++latest;
  hideError();
  $("result").hidden = true;
  $("result").dataset.photo = file.name;
  $("result").dataset.state = "pending";
  const task = option.dataset.task;
  const endpoint = task === "detection" ? "v1/detect" : "v1/classify";
  const form = new FormData();
  form.append("image", file);
  try {
    // Decode here while the gateway works; both orient the photo by its EXIF tag.
    const [answer, bitmap] = await Promise.all([
      fetch(`${endpoint}?model=${encodeURIComponent(option.value)}`, { method: "POST", body: form })
        .then(getJson),
      createImageBitmap(file).catch(() => null),
    ]);
    if (ticket === latest) show(task, answer, bitmap);
  } catch (err) {
    if (ticket !== latest) return;
    $("result").dataset.state = "error";
    showError(err);
  }
}

function show(task, answer, bitmap) {
  const { model, predictions: [prediction] } = answer;
  const labels = model.labels.length ? ` (${model.labels.join(", ")})` : "";
  const result = $("result");
  result.hidden = false; // before drawing: a hidden section has no width to fit
  $("answered").textContent = `Answered by ${model.name} version ${model.version}${labels}`;
  result.dataset.model = model.name;
  result.dataset.version = model.version;
  $("note").hidden = true;
  const found = task === "detection" ? prediction.detections : prediction.classes;
  listScores(found);
  result.dataset.top = found.length ? found[0].label : "";
  if (task === "detection") {
    result.dataset.boxes = drawBoxes(bitmap, prediction);
  } else {
    delete result.dataset.boxes;
    drawPhoto(bitmap);
  }
  result.dataset.state = "done";
}

// Labels with scores, best first, each with a bar as long as its score.
function listScores(found) {
  $("classes").replaceChildren(...found.map((c) => {
    const item = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(c.score * 200)}px`;
    item.append(`${c.label} ${c.score.toFixed(3)}`, bar);
    return item;
  }));
}

// Draws the photo scaled down to fit the page (never up); returns canvas pixels per
// photo pixel. Drawing at the shown size keeps the box labels readable.
function drawPhoto(bitmap) {
  const canvas = $("view");
  canvas.hidden = !bitmap;
  if (!bitmap) {
    $("note").textContent = "This browser cannot show this image; the answer above is the gateway's.";
    $("note").hidden = false;
    return 1;
  }
  const style = getComputedStyle(canvas.parentElement);
  const room = canvas.parentElement.clientWidth
    - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const scale = Math.min(1, room / bitmap.width, (0.6 * window.innerHeight) / bitmap.height);
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return scale;
}

// Boxes come in the upright photo's pixels: the bitmap's own size, when the browser
// applied the same EXIF orientation as the gateway. Returns the number drawn.
function drawBoxes(bitmap, prediction) {
  const scale = drawPhoto(bitmap);
  if (!bitmap) return 0;
  if (bitmap.width !== prediction.width || bitmap.height !== prediction.height) {
    $("note").textContent = `The gateway saw a ${prediction.width}×${prediction.height} image, `
      + `this browser a ${bitmap.width}×${bitmap.height} one: the boxes may not line up.`;
    $("note").hidden = false;
  }
  const ctx = $("view").getContext("2d");
  ctx.lineWidth = 3;
  ctx.font = "14px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const { label, score, box } of prediction.detections) {
    const x = box.xmin * scale, y = box.ymin * scale;
    const w = (box.xmax - box.xmin) * scale, h = (box.ymax - box.ymin) * scale;
    ctx.strokeStyle = ctx.fillStyle = BOX_COLOUR;
    ctx.strokeRect(x, y, w, h);
    const text = `${label} ${score.toFixed(2)}`;
    const ty = y >= 20 ? y - 20 : y; // the tag above the box, or inside it at the top
    ctx.fillRect(x, ty, ctx.measureText(text).width + 8, 20);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x + 4, ty + 3);
  }
  return prediction.detections.length;
}

function showError(err) {
  const box = $("error");
  const p = err.problem;
  const heading = document.createElement("strong");
  heading.textContent = p ? `${p.status} ${p.title || "Error"}` : "Could not reach the gateway";
  const detail = document.createElement("div");
  detail.textContent = p ? p.detail || "" : String(err.message || err);
  box.replaceChildren(heading, detail);
  if (p && (p.code || p.request_id)) {
    const extra = document.createElement("pre");
    extra.textContent = [p.code && `code: ${p.code}`, p.request_id && `request id: ${p.request_id}`]
      .filter(Boolean).join("\n");
    box.append(extra);
  }
  box.dataset.status = p ? p.status : "";
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  send(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => send(e.target.files[0]));
$("model").addEventListener("change", () => send(photo));
loadModels();
