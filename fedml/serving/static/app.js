// The shopping guide page: browse the catalogue, fill a basket, see the recommendations follow it.
"use strict";

const PAGE = 20;
const state = { basket: [], offset: 0, query: "", total: 0, requestId: 0, pageId: 0 };
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(url + ": " + response.status + " " + (await response.text()));
  return response.json();
}

function itemRow(id, buttonLabel, onClick, extra) {
  const li = document.createElement("li");
  li.dataset.item = id;
  const text = document.createElement("span");
  const name = document.createElement("span");
  name.className = "id";
  name.textContent = id;
  text.appendChild(name);
  if (extra) text.appendChild(extra);
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = buttonLabel;
  button.addEventListener("click", onClick);
  li.append(text, button);
  return li;
}

async function loadModelInfo() {
  try {
    const info = await getJSON("/version");
    const eps = info.privacy["privacy.epsilon"];
    const privacy = eps === undefined ? "" : ` · ε = ${Number(eps).toPrecision(3)} (δ = ${info.privacy["privacy.delta"]}) per ${info.privacy["privacy.unit"]}`;
    $("model-info").textContent = info.version === null
      ? `model ${info.name}: not loaded yet`
      : `model ${info.name} version ${info.version} · ${info.n_items} items${privacy}`;
    $("model-info").dataset.version = info.version ?? "";
  } catch (error) {
    $("model-info").textContent = "model information unavailable: " + error.message;
  }
}

async function loadCatalogue() {
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE, q: state.query });
  const pageId = ++state.pageId; // answers to older searches are dropped
  try {
    const page = await getJSON("/items?" + params);
    if (pageId !== state.pageId) return;
    state.total = page.total;
    const list = $("catalogue");
    list.replaceChildren(...page.items.map((id) => itemRow(id, "add", () => addToBasket(id))));
    const last = Math.min(state.offset + PAGE, page.total);
    $("page-label").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
    $("catalogue-status").textContent = page.total ? "" : "No item matches.";
    $("prev").disabled = state.offset === 0;
    $("next").disabled = last >= page.total;
  } catch (error) {
    $("catalogue-status").textContent = "Catalogue unavailable: " + error.message;
  }
}

function addToBasket(id) {
  if (!state.basket.includes(id)) state.basket.push(id);
  renderBasket();
}

function removeFromBasket(id) {
  state.basket = state.basket.filter((x) => x !== id);
  renderBasket();
}

function renderBasket() {
  $("basket").replaceChildren(...state.basket.map((id) => itemRow(id, "remove", () => removeFromBasket(id))));
  $("basket-empty").hidden = state.basket.length > 0;
  refreshRecommendations();
}

async function refreshRecommendations() {
  const requestId = ++state.requestId; // answers to older baskets are dropped
  const body = { items: state.basket, k: Number($("k").value) };
  $("recommendations-status").textContent = "updating…";
  $("recommendations").setAttribute("aria-busy", "true");
  try {
    const response = await fetch("/recommend", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const answer = await response.json();
    if (requestId !== state.requestId) return;
    if (!response.ok) throw new Error(response.status + ": " + (answer.detail ?? JSON.stringify(answer)));
    $("recommendations").replaceChildren(...answer.items.map((rec) => {
      const extra = document.createElement("span");
      extra.className = "reason";
      extra.textContent = `${rec.reason} · score ${rec.score.toFixed(3)}`;
      const li = itemRow(rec.item, "add", () => addToBasket(rec.item), extra);
      li.dataset.score = rec.score;
      return li;
    }));
    $("unknown").hidden = answer.unknown_items.length === 0;
    $("unknown").textContent = "Not in this model's catalogue (ignored): " + answer.unknown_items.join(", ");
    $("recommendations-status").textContent = state.basket.length
      ? `for ${state.basket.length} item(s) in the basket, model version ${answer.model.version}`
      : `popular items (the basket is empty), model version ${answer.model.version}`;
  } catch (error) {
    if (requestId !== state.requestId) return;
    $("recommendations").replaceChildren();
    $("recommendations-status").textContent = "No recommendations: " + error.message;
  } finally {
    if (requestId === state.requestId) $("recommendations").setAttribute("aria-busy", "false");
  }
}

$("search-form").addEventListener("submit", (event) => event.preventDefault());
$("search").addEventListener("input", () => {
  state.query = $("search").value.trim();
  state.offset = 0;
  loadCatalogue();
});
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadCatalogue(); });
$("next").addEventListener("click", () => { state.offset += PAGE; loadCatalogue(); });
$("clear").addEventListener("click", () => { state.basket = []; renderBasket(); });
$("k").addEventListener("change", refreshRecommendations);
$("token").addEventListener("change", refreshRecommendations);

loadModelInfo();
loadCatalogue();
renderBasket();
