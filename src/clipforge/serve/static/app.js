// The search page: text queries and image uploads go to the JSON API; results become a thumbnail grid.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const upload = document.getElementById("image-upload");
const countInput = document.getElementById("count");
const statusLine = document.getElementById("status");
const statusText = document.getElementById("status-text");
const preview = document.getElementById("query-preview");
const grid = document.getElementById("results");
const moreButton = document.getElementById("more-results");
let maxResults = Infinity;  // the server's max_k
let current = null;  // the search on screen: {run(k) → results, what, k}

function showStatus(message, isError = false) {
  statusText.textContent = message;
  statusLine.classList.toggle("error", isError);
}

function showError(error) {
  // A failed search leaves no results of an earlier one on screen.
  grid.replaceChildren();
  moreButton.hidden = true;
  showStatus(error.message, true);
}

function showPreview(file) {
  // The image searched for, beside the status line; a text search hides it.
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  preview.src = file ? URL.createObjectURL(file) : "";
}

async function moreLikeThis(result) {
  // Search by the result's own image (the full file), as an upload would.
  const blob = await (await fetch(result.image)).blob();
  searchImage(new File([blob], fileName(result), { type: blob.type }));
}

function fileName(result) {
  const name = result.sample || result.path || result.caption || result.uid || "";
  return String(name).split("/").pop();
}

function render(results, what) {
  grid.replaceChildren();
  for (const result of results) {
    const figure = document.createElement("figure");
    figure.className = "result";
    const link = document.createElement("a");
    link.href = result.image;
    link.target = "_blank";
    const image = document.createElement("img");
    image.src = result.thumbnail;
    image.alt = result.caption || fileName(result);
    image.loading = "lazy";
    image.addEventListener("error", () => figure.classList.add("unavailable"));
    link.append(image);
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = fileName(result);
    name.title = result.path || "";
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "more like this";
    more.addEventListener("click", () => moreLikeThis(result).catch(showError));
    caption.append(score, name, more);
    if (result.caption) {
      const text = document.createElement("span");
      text.className = "caption-text";
      text.textContent = result.caption;
      caption.append(text);
    }
    figure.append(link, caption);
    grid.append(figure);
  }
  showStatus(`${results.length} results for ${what}`);
}

async function request(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body.results;
}

async function show(search, k) {
  // Run a search for its top k and render them; "more results" offers the next page while the server
  // returned all k asked for and its max_k allows more.
  current = { ...search, k };
  moreButton.hidden = true;
  showStatus("searching…");
  try {
    const results = await search.run(k);
    render(results, search.what);
    moreButton.hidden = results.length < k || k >= maxResults;
  } catch (error) {
    showError(error);
  }
}

function pageSize() {
  return Math.max(1, Number(countInput.value) || 1);
}

function searchText(query) {
  history.replaceState(null, "", `?${new URLSearchParams({ q: query })}`);
  showPreview(null);
  const run = (k) => request(`/api/search?${new URLSearchParams({ q: query, k })}`);
  return show({ run, what: `“${query}”` }, Math.min(pageSize(), maxResults));
}

function searchImage(file) {
  queryInput.value = "";  // the box no longer shows an earlier text query
  history.replaceState(null, "", location.pathname);
  showPreview(file);
  const run = (k) => {
    const body = new FormData();
    body.append("image", file);
    body.append("k", k);
    return request("/api/search/image", { method: "POST", body });
  };
  return show({ run, what: file.name }, Math.min(pageSize(), maxResults));
}

moreButton.addEventListener("click", () => show(current, Math.min(current.k + pageSize(), maxResults)));

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (queryInput.value.trim()) searchText(queryInput.value.trim());
});
upload.addEventListener("change", () => {
  if (upload.files.length) searchImage(upload.files[0]);
  upload.value = "";
});

async function start() {
  // The server's limit on results, then the search named in the address (shared links).
  try {
    const health = await (await fetch("/api/health")).json();
    maxResults = health.max_k;
    countInput.max = health.max_k;
    countInput.value = Math.min(Number(countInput.value), health.max_k);
    showStatus(`${health.vectors} images`);
  } catch (error) {
    showStatus(`server unreachable: ${error.message}`, true);
  }
  const initial = new URLSearchParams(location.search).get("q");
  if (initial) {
    queryInput.value = initial;
    searchText(initial);
  }
}

start();
