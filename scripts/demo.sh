#!/usr/bin/env bash
# The walk-through of docs/pacs.md on the real radiographs in examples/radiographs, against a running server:
#   bash scripts/demo.sh [BASE_URL]        (default http://127.0.0.1:8000; needs curl and jq)
# Each run enrols into a collection of its own (demo-<time>-<random>), takes every id from the
# answers, and exits non-zero at the first answer that is not what docs/pacs.md says.
# With CXR_REID_API_KEY set, it sends that key as X-API-Key.
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${1:-http://127.0.0.1:8000}
URL=${URL%/}
IMG=examples/radiographs
COLLECTION="demo-$(date -u +%Y%m%d-%H%M%S)-$RANDOM"
for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "demo: needs $tool (e.g. apt-get install $tool)" >&2; exit 2; }
done
AUTH=()
if [ -n "${CXR_REID_API_KEY:-}" ]; then AUTH=(-H "X-API-Key: $CXR_REID_API_KEY"); fi

step() { printf '\n== %s\n' "$*"; }
# call METHOD PATH [curl args...]: print the answer's body; fail on a transport error or a 4xx/5xx
call() {
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body -X "$method" "${AUTH[@]}" "$@" "$URL$path" || {
        echo >&2
        echo "demo: $method $path failed (is the server running at $URL?)" >&2
        exit 1
    }
}
# expect JSON FILTER WHAT: the jq FILTER must be true of the answer JSON, else stop
expect() {
    if ! jq -e "$2" >/dev/null <<<"$1"; then
        echo "demo: unexpected answer: $3 (checked: $2)" >&2
        jq . <<<"$1" >&2
        exit 1
    fi
    echo "ok: $3"
}

step "Is the service ready? (model, gallery size, thresholds in force)"
answer=$(call GET /readyz)
jq '{status, model_id, gallery_images, threshold: .operating_point.threshold, far: .operating_point.far}' <<<"$answer"
expect "$answer" '.status == "ready"' "the service is ready"

step "Embed one radiograph: a unit-norm identity vector"
answer=$(call POST /embed -F file=@$IMG/child-a-1.jpeg)
jq '{model_id, dim: .results[0].dim, first_values: .results[0].embedding[:4]}' <<<"$answer"
expect "$answer" '.results[0].dim == (.results[0].embedding | length)' "one embedding of the model's dimension"

step "Enrol children A, B and C in collection $COLLECTION (no alert: each looks like no one else)"
answer=$(call POST /images -F file=@$IMG/child-a-1.jpeg -F patient_id=child-A -F collection="$COLLECTION")
jq '.images[] | {image_id, patient_id: .image.patient_id, alert}' <<<"$answer"
expect "$answer" '.images[0].alert == null' "child A enrolled without an alert"
A1=$(jq -r '.images[0].image_id' <<<"$answer")
answer=$(call POST /images -F files=@$IMG/child-b-1.jpeg -F files=@$IMG/child-b-2.jpeg \
    -F patient_id=child-B -F collection="$COLLECTION")
jq '.images[] | {image_id, patient_id: .image.patient_id, alert}' <<<"$answer"
expect "$answer" '[.images[].alert] == [null, null]' "child B's two images enrolled without an alert"
B1=$(jq -r '.images[0].image_id' <<<"$answer")
answer=$(call POST /images -F file=@$IMG/child-c-1.jpeg -F patient_id=child-C -F collection="$COLLECTION")
jq '.images[] | {image_id, patient_id: .image.patient_id, alert}' <<<"$answer"
expect "$answer" '.images[0].alert == null' "child C enrolled without an alert"
answer=$(call GET "/images?collection=$COLLECTION&patient_id=child-B")
expect "$answer" '.total == 2' "the gallery lists child B's two images"

step "Same patient? A's second radiograph against A's enrolled image: yes"
answer=$(call POST /verify -F file_a=@$IMG/child-a-2.jpeg -F image_id_b="$A1")
jq '{score, threshold, same_patient, probability, prior}' <<<"$answer"
expect "$answer" '.same_patient == true and .probability >= 0.5' "same patient verified, probability >= 0.5 at its prior"

step "Same patient? A's second radiograph against B's: no"
answer=$(call POST /verify -F file_a=@$IMG/child-a-2.jpeg -F image_id_b="$B1")
jq '{score, threshold, same_patient, probability, prior}' <<<"$answer"
expect "$answer" '.same_patient == false and .probability < 0.5' "different patients rejected, probability < 0.5 at its prior"

step "Is this radiograph child B? B's third image against all of B's enrolled images: yes"
answer=$(call POST /verify -F file=@$IMG/child-b-3.jpeg -F patient_id=child-B -F collection="$COLLECTION")
jq '{patient_id, compared_with, best_score, mean_score, threshold, same_patient}' <<<"$answer"
expect "$answer" '.same_patient == true and .compared_with == 2' "B's new image verified as child B"
answer=$(call POST /verify -F file=@$IMG/child-c-2.jpeg -F patient_id=child-B -F collection="$COLLECTION")
expect "$answer" '.same_patient == false' "C's second image is not child B"

step "Nearest matches of A's second radiograph: A's image first, the only one above the threshold"
answer=$(call POST /search -F file=@$IMG/child-a-2.jpeg -F k=3 -F collection="$COLLECTION")
jq '.matches[] | {image_id, patient_id, score, same_patient}' <<<"$answer"
expect "$answer" ".matches[0].image_id == $A1 and .matches[0].same_patient" "A's image is the top match"
expect "$answer" '[.matches[1:][].same_patient] | all | not' "no other child matches"

step "A deliberate misfile: A's second radiograph enrolled under child C raises the alert"
answer=$(call POST /images -F file=@$IMG/child-a-2.jpeg -F patient_id=child-C -F collection="$COLLECTION")
jq '.images[0] | {image_id, patient_id: .image.patient_id, alert}' <<<"$answer"
expect "$answer" '.images[0].alert.kind == "matches_other_patient" and .images[0].alert.other_patient_id == "child-A"' \
    "wrong-patient alert: it matches child A"
MISFILED=$(jq -r '.images[0].image_id' <<<"$answer")

step "Duplicates with conflicting labels: the misfiled image and A's image"
answer=$(call GET "/duplicates?collection=$COLLECTION&conflicts_only=true")
jq '{total_conflicts, pairs: [.pairs[] | {a: .a.patient_id, b: .b.patient_id, score, conflict}]}' <<<"$answer"
expect "$answer" "[.pairs[] | [.a.image_id, .b.image_id] | sort] == [[$A1, $MISFILED]]" \
    "one conflict: image $MISFILED (child-C) looks like image $A1 (child-A)"

step "Fix it: delete the misfiled image, enrol it under child A (no alert), no conflict left"
answer=$(call DELETE "/images/$MISFILED")
expect "$answer" '.deleted == 1' "misfiled image deleted"
answer=$(call POST /images -F file=@$IMG/child-a-2.jpeg -F patient_id=child-A -F collection="$COLLECTION")
expect "$answer" ".images[0].alert == null and .images[0].matches[0].image_id == $A1" \
    "re-enrolled under child A, matching A's image, no alert"
answer=$(call GET "/duplicates?collection=$COLLECTION&conflicts_only=true")
expect "$answer" '.total_conflicts == 0' "no conflicting labels left"

printf '\ndemo: every answer was as docs/pacs.md says (collection %s; remove it with\n' "$COLLECTION"
printf '  curl -X DELETE "%s/patients/child-A?collection=%s", and child-B, child-C)\n' "$URL" "$COLLECTION"
