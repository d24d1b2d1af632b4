"""What staff should do about each check, in steps they can follow without a manual.

Digests and `oprecon reconcile --patient` print these beside each item. The facts come
from the practice-side OP Portal troubleshooting guide; the wording is ours.
"""

from __future__ import annotations

REMEDIES: dict[str, tuple[str, ...]] = {
    "authority_invalid": (
        "In OP, open the child's chart and go to the Family Contacts tab.",
        "Select this parent and look at the Authority field.",
        "If the parent is legally entitled to access, set Authority to Joint or Exclusive; "
        "oprecon never changes authority on its own because it is a legal decision.",
        "Check the email address, then click Register to send the Welcome email.",
    ),
    "self_role": (
        "In OP, open the parent's own patient chart (the chart named here: the one whose "
        "Family Contacts list the parent as Self) and go to Family Contacts.",
        "Find the entry for the parent themself: its Role/Reason says Self.",
        "Change Role/Reason to Other Relative and set Authority to Joint or Exclusive.",
        "Confirm the email address, then click Register to send the Welcome email.",
    ),
    "self_dependent_missing": (
        "In OP, open the parent's own patient chart and go to Family Contacts.",
        "Add a family contact: search by last name, highlight the parent's existing contact "
        "record and click Select (do not create a new contact).",
        "Set Role/Reason to Other Relative (never Self) and Authority to Joint or Exclusive.",
        "Confirm the email address; after they register they will see themselves as a "
        "dependent next to their children.",
    ),
    "contact_email_invalid": (
        "In OP, open Practice Management > Contact Manager and find the contact by last name.",
        "Ask the parent for their current email address and correct it.",
        "From the child's Family Contacts, click Register to send the Welcome email.",
    ),
    "contact_inactive": (
        "An inactive contact is most often a duplicate: in OP, open Practice Management > "
        "Contact Manager and search by last name, then by email address.",
        "If a second record for the same person exists, use Merge Contacts.",
        "If none is found, search Demographic Analysis/Recall (DAR) with no date "
        "restrictions, sorted by email, then by date of birth.",
        "If there truly is no duplicate, make the contact Active again.",
    ),
    "contact_duplicate": (
        "In OP, open Practice Management > Contact Manager and search by the last name.",
        "Compare the records listed here (email, date of birth, phone) to confirm they are "
        "one person.",
        "Use Merge Contacts, keeping the record that is active and attached to the "
        "children's charts.",
        "oprecon checks again on its next scan; the portal shows the change after about "
        "15 minutes.",
    ),
    "patient_inactive": (
        "In OP, open the patient's chart, Basic Information tab, and confirm the status.",
        "If the patient should be Active, make them Active; the portal updates within about "
        "15 minutes.",
        "If the patient has left the practice, contact OP support to deactivate the "
        "portal user and their caregiver links.",
    ),
    "patient_email_present": (
        "In OP, open the child's chart, Basic Information tab.",
        "Clear the email field or enter N/A: a child's chart must not hold an email, or the "
        "child will not appear under the parent's portal account.",
        "Wait about 15 minutes and check the parent's portal account again.",
    ),
    "portal_patient_email_not_dummy": (
        "oprecon sets the portal user's email to an @dummy.com address automatically when "
        "fixes are on.",
        "To do it by hand: OP Portal admin > Users, search last name+first name, open the "
        "patient and change the email to an @dummy.com address.",
        "Wait about 15 minutes and confirm the patient shows under the parent's account.",
    ),
    "portal_patient_role_invalid": (
        "OP Portal admin > Users: open the patient and check the Role.",
        "A patient's portal user must have the role Patient; this cannot be changed from "
        "the practice side. Contact OP support with the portal user id.",
    ),
    "caregiver_link_missing": (
        "oprecon refreshes the parent's portal connection automatically when fixes are on, "
        "once the chart and the parent are in order in OP (an open chart email, inactive "
        "record, duplicate, authority or Self problem in the family is fixed first).",
        "To do it by hand: OP Portal admin > Users, open the parent, Profile > Sources, "
        "click the ellipsis under Actions, Disconnect and Confirm, then Connect and Confirm.",
        "Wait 10-20 minutes; the child should appear under Dependents.",
        "If it still does not, contact OP support.",
    ),
    "caregiver_link_stale": (
        "Privacy: the portal still shows this child to a person OP no longer authorizes, "
        "or whose contact record OP no longer has, or the child's chart is no longer in OP "
        "(deleted or merged).",
        "Confirm in OP (child's chart > Family Contacts) that removing the access was "
        "intended; if the contact was merged, make sure the remaining record has the "
        "authority it should; if the chart was merged into another, the person sees the "
        "child through the remaining chart once it lists them with Joint or Exclusive "
        "authority.",
        "oprecon refreshes the person's portal connection when fixes are on; by hand: OP "
        "Portal admin > Users > the person > Profile > Sources, Disconnect then Connect.",
        "If the child is still listed under their Dependents after 20 minutes, contact OP "
        "support at once.",
    ),
    "welcome_not_sent": (
        "oprecon resends the Welcome email (Register) automatically when fixes are on, at "
        "most once per window to each address: a new address gets its own resend.",
        "By hand: in OP, child's chart > Family Contacts, check Authority (Joint or "
        "Exclusive) and the email address, then click Register and confirm.",
        "If the parent is also a patient and a chart lists them as Self (their own, whatever "
        "the contact record says), fix that first: the email is never sent while it is "
        "there, so oprecon waits for it.",
        "To see what was sent: OP Portal admin > Reports > Audit Log, action "
        "'Profile: Welcome Mail Sent'.",
    ),
    "portal_orphan_user": (
        "The portal has a user whose OP patient or contact no longer exists (often after a "
        "merge). If that user still sees a child, a separate high-severity item says so.",
        "Look up the OP record the user should belong to; if it was merged, refresh the "
        "user's source from OP Portal admin > Users > Profile > Sources.",
        "If the user should not exist, contact OP support to remove it.",
    ),
    "invalid_record": (
        "A row in an export or table could not be read; the message names the file and line.",
        "Correct the record in OP (or the export job) so the value has the expected format.",
        "The rest of the data was reconciled as usual.",
    ),
}

ESCALATION = (
    "oprecon applied the fix and checked again after the portal's delay, and the problem is "
    "still there.",
    "Contact OP support with the ids in this item.",
)
