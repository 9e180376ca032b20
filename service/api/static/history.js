// The tab's earlier results, kept in sessionStorage: they survive a reload, not the tab.

const KEY = "clusca-playground-history";
const KEEP = 24;

export function load() {
  try {
    const items = JSON.parse(sessionStorage.getItem(KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

export function add(entry) {
  let items = [entry, ...load()].slice(0, KEEP);
  // Images are data: URLs; when the tab's storage is full, the oldest results go first.
  while (items.length) {
    try {
      sessionStorage.setItem(KEY, JSON.stringify(items));
      break;
    } catch {
      items = items.slice(0, -1);
    }
  }
  return items;
}

export function clear() {
  sessionStorage.removeItem(KEY);
}

export function dataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
